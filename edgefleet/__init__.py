"""edgefleet: the console entry point that ties toolchain, agent and fleet server together."""

__version__ = "0.1.0"
