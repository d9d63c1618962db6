"""Dispatch: which deployment serves a request (router, health), and the relay that sends it,
fails over, pays for it and meters it; the fair scheduler and capacity limits beside them."""
