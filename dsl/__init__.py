"""The datasel language: parser, checker, planner, engine, cache, data layer and CLI."""
