"""enshuffle.node"""
