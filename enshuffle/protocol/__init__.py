"""enshuffle.protocol"""
