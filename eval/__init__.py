"""KensaVL eval."""
