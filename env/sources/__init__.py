"""Data sources: the ViZDoom game and recorder, the policies that play it, the Gymnasium recorder."""
