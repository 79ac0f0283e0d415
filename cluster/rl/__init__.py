"""Reinforcement learning from feedback on Ray: actor groups and the PPO driver."""
