"""Trained fold models put to use: whole images by patch votes, whole slides as maps, the k-fold image report."""
