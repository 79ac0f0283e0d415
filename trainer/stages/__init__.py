"""One module per training stage, each exposing ``CONFIG`` (its pydantic schema) and
``train(config) -> dict`` (the summary); ``cluster/commands/train.py`` maps stage names to them and
``trainer.stages.loop`` holds the loop they share."""
