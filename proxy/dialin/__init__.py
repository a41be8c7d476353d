"""Dial-in devices (CENCn): devices that connect in, say who they are, and get a direct-access port each."""
