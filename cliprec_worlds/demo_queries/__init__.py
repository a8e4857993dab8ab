"""The demo world's shoppers: `shoppers` writes their queries and judges them from the world's truth."""
