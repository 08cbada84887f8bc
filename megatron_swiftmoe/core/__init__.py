"""The SwiftMoE strategy: placement, dispatcher, expert slots, MoE layer, optimizer, settings, CPU shims."""
