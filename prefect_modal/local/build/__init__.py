"""Local image builds: a Modal image definition made into layers on this machine.

Rooms by Modal's areas: `recipe` reads the Dockerfile commands the client
sends, `pythons` finds the interpreters `debian_slim(python_version=...)` can
use, `cache` keeps built layers (shared by every local server on the
machine), `pip` runs the install lines with ``uv`` (in a build sandbox),
`run_layers` makes a ``run_commands`` layer of a build sandbox's root,
`builder` puts it together, and ``apt`` (another module) installs Debian
packages.
"""
