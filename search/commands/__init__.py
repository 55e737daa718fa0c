"""What a user types and what it prints: create/start/worker, fleet, status, best, report,
dashboard, compare, train, the console's progress. Imports the rules and the training plane."""
