"""flasht5"""
