"""Tests of this kind: a real PostgreSQL, in this process: stages, SQL functions, roles,
operator commands, the console's pages."""
