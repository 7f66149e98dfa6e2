"""Operations: the command line and the operator commands (status, trace, doctor)."""
