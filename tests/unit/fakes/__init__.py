"""Fakes and builders shared by the unit tests (no tests here): a fake ContainerService
and API harness (``service``), a fake rexecd for the client (``daemon``), image
tarball builders (``images``)."""
