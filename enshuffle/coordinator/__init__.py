"""enshuffle.coordinator"""
