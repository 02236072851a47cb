"""Gymnasium envs for agents: inside a world model, and the real game behind the same interface."""
