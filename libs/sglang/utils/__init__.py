"""Small shared mechanisms (no project imports)."""
