"""Learned heads the env reads off frames (reward, depth and pose) and their trainers."""
