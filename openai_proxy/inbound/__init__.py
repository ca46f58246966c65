"""The inbound side of a request: authentication, body parsing and validation, client disconnects."""
