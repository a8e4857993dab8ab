"""The demo world's catalog: `synthetic` draws it from the vocabulary tables in this folder."""
