"""enshuffle.tui"""
