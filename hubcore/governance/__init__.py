"""Who may do what: hub tokens, limits and budgets."""
