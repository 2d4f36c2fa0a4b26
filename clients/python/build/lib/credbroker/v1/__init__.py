"""The credbroker.v1 contract: message classes generated from proto/ (see
scripts/gen_stubs.py). Their text form prints secrets: log the package's own
types (``Credentials``, ``KeySet``), which redact them."""
