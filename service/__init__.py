"""backbones: fine-tune pretrained image backbones and compare them fairly.

The top level holds only what every stage shares: ``errors`` (the exit codes and the one-line
user error), ``suggest`` (did-you-mean), ``digest`` (how files, values and long names are hashed)
and the package version. Each stage of the pipeline is a package; docs/architecture.md draws
the data flow between them.
"""


def version() -> str:
    """The installed package's version, also the image tag; "0.0.0" from a source tree that was
    never installed (a valid tag, unlike a PEP 440 local version)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("backbones")
    except PackageNotFoundError:
        return "0.0.0"
