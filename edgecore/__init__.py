"""The foundation: the torch-free contract every side shares (docs/architecture.md).

The typed manifest and its one reader, the one bundle writer/reader, signatures, the wire format and topics,
the tasks' contract half, detection decode, the error family. It imports nothing of the rest of the project.
"""
