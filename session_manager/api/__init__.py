"""The front door: routes, request/response models, the one error middleware."""
