"""Builds the optional native batch path of ECDH-PSI (protocols/x25519_batch.c over OpenSSL's
libcrypto) with cffi; everything else about the package is in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["protocols/x25519_batch_build.py:ffibuilder"])
