"""Answer checkers that need more than a pure function: their own process, signals or timeouts."""
