"""Typed records: the manifest and everything it holds, turned into JSON and back by pydantic."""
