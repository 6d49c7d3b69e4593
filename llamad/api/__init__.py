"""The API faces: wire <-> neutral request, one folder per family. A face never imports an engine backend or another face."""
