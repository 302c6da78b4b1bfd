"""Every error the workbench raises on purpose: one base, :class:`WorkbenchError`, with named subclasses.

Catch ``WorkbenchError`` to catch them all. Each message names the slide, file, array or parameter at
fault and what to do; the subclasses also derive from the matching built-in (``ValueError``,
``RuntimeError``, ``OSError``) so existing ``except ValueError`` code keeps working.

=========================  ===========================================================================
error                      raised when
=========================  ===========================================================================
``ParameterError``         a public function gets a parameter of the wrong type or out of range
``ManifestError``          a manifest has bad rows (every bad row is listed)
``SlideError``             a slide file cannot be opened or read, or states no usable mpp
``SlideTimeoutError``      a per-slide task ran past its time limit
``WeightsError``           encoder weights are missing, unsafe or do not match the architecture
``StoreError``             a store is missing, of another layout, or lacks an earlier stage's output
``StoreLockedError``       another run holds the store's write lock
``LayoutVersionError``     the store was written by another layout version (``python -m workbench migrate``)
``IntegrityError``         a stored value cannot be trusted (base of the two below)
``ChecksumError``          a chunk's checksum does not match: the bytes on disk changed
``MissingChunkError``      a chunk file that was written is gone
``StaleError``             an artefact's inputs changed since it was built (says what changed, how to rebuild)
``StaleIndexError``        a saved search index no longer matches the features it was built from
``RunExistsError``         a named run exists with other parameters and ``overwrite=True`` was not given
``SweepError``             a sweep file or ``--set`` value is refused (file, line and key named)
=========================  ===========================================================================
"""

from __future__ import annotations

__all__ = [
    "ChecksumError",
    "IntegrityError",
    "LayoutVersionError",
    "ManifestError",
    "MissingChunkError",
    "ParameterError",
    "RunExistsError",
    "SlideError",
    "SlideTimeoutError",
    "StaleError",
    "StaleIndexError",
    "StoreError",
    "StoreLockedError",
    "SweepError",
    "WeightsError",
    "WorkbenchError",
]


class WorkbenchError(Exception):
    """Base of every error the workbench raises on purpose."""


class ParameterError(WorkbenchError, ValueError):
    """A parameter of a public function has the wrong type or is out of range (the message names it)."""


class ManifestError(WorkbenchError, ValueError):
    """A manifest that cannot be used: every bad row is listed in the message."""


class SlideError(WorkbenchError, RuntimeError):
    """A slide that cannot be opened or read, or that states no usable mpp (the message names the slide)."""


class SlideTimeoutError(SlideError):
    """A per-slide task ran past its time limit."""


class WeightsError(WorkbenchError, RuntimeError):
    """Encoder weights that are missing, unsafe to load, or do not match the architecture."""


class StoreError(WorkbenchError, RuntimeError):
    """A store that is missing, of another layout, or lacks an earlier stage's output."""


class StoreLockedError(StoreError):
    """Another run holds the store's write lock."""


class LayoutVersionError(StoreError):
    """The store was written by another layout version."""


class IntegrityError(StoreError):
    """A stored value that cannot be trusted."""


class ChecksumError(IntegrityError):
    """A chunk whose checksum does not match its bytes."""


class MissingChunkError(IntegrityError):
    """A chunk that was written and is gone (never read back as the fill value)."""


class StaleError(StoreError):
    """An artefact whose inputs changed since it was built."""


class StaleIndexError(StaleError):
    """A saved index that no longer matches the features it was built from."""


class RunExistsError(StoreError):
    """A named run already exists with other parameters."""


class SweepError(WorkbenchError, ValueError):
    """A sweep file or override that is refused."""
