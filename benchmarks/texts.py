"""Fixed benchmark text: 15 sentences of ordinary English prose (about a minute of speech)."""

SENTENCES = [
    "The old lighthouse keeper climbed the spiral stairs every evening at dusk.",
    "He carried a small brass lantern and a notebook filled with weather reports.",
    "From the top, the whole bay spread out beneath him like a map.",
    "Fishing boats returned slowly, their engines humming over the quiet water.",
    "Some nights the fog rolled in so thick that he could barely see his own hands.",
    "On those nights, the great lamp turned patiently, sweeping its beam across the waves.",
    "Ships far out at sea relied on that steady light to find their way home.",
    "In the winter, storms battered the rocks and rattled the windows of the tower.",
    "Still, he never missed a single evening in thirty years of service.",
    "The villagers said he knew the moods of the ocean better than anyone alive.",
    "When he finally retired, they held a celebration in the harbor square.",
    "Children brought drawings of the lighthouse, and the baker made a cake in its shape.",
    "The keeper smiled, thanked everyone, and told one last story about a midnight rescue.",
    "Then he walked down to the shore and watched the new automatic light flicker on.",
    "It was brighter than his old lamp, but he thought it looked a little lonely.",
]

PARAGRAPH = " ".join(SENTENCES)
