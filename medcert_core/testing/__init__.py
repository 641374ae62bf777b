"""Test-data writers: the paper-layout fixtures (synthetic files in each dataset's distributed layout)."""
