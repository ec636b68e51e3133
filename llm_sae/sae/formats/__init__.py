"""Readers for saved SAEs: this project's folders, SAELens's and sparsify's."""
