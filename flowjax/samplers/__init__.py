"""Samplers: ODE solvers, few-step flow-map and pushforward samplers, AR-flow inversion."""
