"""Prices, the cost of each request, and the month's spend against the budget."""
