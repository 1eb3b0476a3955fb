"""Regularizers: loss terms and actions around a step's forward and backward (the fifth method axis,
lorabench/methods/base.py ``Regularizer``)."""
