"""The benchmark's Django app: one no-op task per backend."""
