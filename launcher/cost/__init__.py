"""What a sweep will cost before it is queued: GPU-hours, wall-clock, memory, the budget."""
