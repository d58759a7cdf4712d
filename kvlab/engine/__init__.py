"""The shared mechanics: cache storage, attention dispatch, rotary control, the decode loop."""
