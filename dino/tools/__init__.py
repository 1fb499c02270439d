"""Command features built on the rest: bench, attention maps, weights in and out."""
