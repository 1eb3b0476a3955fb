"""Result records: schema, atomic writes, reading, tables."""
