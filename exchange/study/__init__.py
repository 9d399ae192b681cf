"""A study's life in one package: how an accepted study becomes what each hospital checks
consent against and what Flower runs (`spec`), and the runners that train it (`runners`).

This package sits below `exchange.coordinator`, `exchange.node` and `exchange.demo` (all three
use it) and above `consent`, `audit` and `federated`; it imports nothing from its users.
"""
