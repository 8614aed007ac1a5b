"""One actor per session: its state table, its record and the actor that alone changes it."""
