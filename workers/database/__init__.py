"""The database: connections, named SQL, migrations, the embedded server."""
