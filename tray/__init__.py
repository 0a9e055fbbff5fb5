"""sottovoce tray: pystray icon, microphone and global hotkey."""
