"""Labelling sampled responses: implicit-reward scores and the rules that make preference pairs of them."""
