"""The template rewriter's table, as data: categories of mutually exclusive options, and the
words an instruction may use around them.

An option: ``key``; ``aliases`` (what a person may type); ``phrase`` (what goes into the prompt);
``markers`` (prompt terms that mean the option is already there; the phrase's comma-separated
pieces and the adjectives count too); ``adjectives`` (markers that describe a noun, "a *rainy*
street"; the first is substituted for a replaced one); ``mild`` / ``strong`` ((phrase, label) at
those intensities); ``label`` (the name in summaries, else the key); ``conflicts`` (options of
other categories whose terms this one removes). A category is ``additive`` when its summary says
"added rain" rather than "set weather to rain". ``templates.py`` checks that no phrase means two
things.
"""

from __future__ import annotations

from typing import Any

CATEGORIES: tuple[dict[str, Any], ...] = (
    {"name": "time of day", "additive": False, "options": (
        {
            "key": "night",
            "aliases": ("night", "nighttime", "night time", "midnight", "evening", "after dark", "nightfall"),
            "phrase": "at night, moonlit sky, glowing lights",
            "markers": ("night", "nighttime", "night time", "midnight", "evening", "moonlit", "moonlight",
                        "starry sky", "under the stars", "after dark", "nightfall", "night sky"),
            "adjectives": ("nighttime", "night", "moonlit", "midnight", "evening"),
            "conflicts": ("sunny",),
        },
        {
            "key": "sunset",
            "aliases": ("sunset", "golden hour", "dusk", "twilight", "sundown"),
            "phrase": "at sunset, golden hour light, long shadows",
            "markers": ("sunset", "golden hour", "dusk", "twilight", "sundown"),
            "adjectives": ("sunset", "twilight"),
            "conflicts": ("sunny",),
        },
        {
            "key": "sunrise",
            "aliases": ("sunrise", "dawn", "daybreak", "early morning", "first light"),
            "phrase": "at sunrise, soft pink dawn light",
            "markers": ("sunrise", "dawn", "daybreak", "early morning", "first light"),
            "adjectives": ("sunrise", "dawn"),
            "conflicts": ("sunny",),
        },
        {
            "key": "day",
            "aliases": ("day", "daytime", "day time", "daylight", "broad daylight", "noon", "midday", "afternoon",
                        "sunny afternoon", "morning", "sunny day"),
            "phrase": "in bright daylight",
            "markers": ("daytime", "day time", "daylight", "broad daylight", "sunny afternoon", "afternoon",
                        "midday", "noon", "high noon", "morning", "late morning", "sunny day", "during the day",
                        "by day"),
            "adjectives": ("sunlit", "daytime", "afternoon", "morning"),
            "label": "daytime",
        },
    )},
    {"name": "weather", "additive": True, "options": (
        {
            "key": "rain",
            "aliases": ("rain", "rainy", "raining", "rainier", "rainfall", "drizzle", "drizzling", "downpour"),
            "phrase": "falling rain, wet reflective surfaces",
            "markers": ("rain", "rainy", "raining", "rainfall", "drizzle", "downpour", "pouring rain",
                        "heavy rain", "light rain", "raindrops", "rain-soaked", "rain-slicked", "wet streets",
                        "rain falling", "pouring rain"),
            "adjectives": ("rainy", "rain-soaked", "rain-slicked"),
            "mild": ("light drizzle", "light rain"),
            "strong": ("heavy pouring rain, puddles, wet reflective surfaces", "heavy rain"),
        },
        {
            "key": "storm",
            "aliases": ("storm", "stormy", "thunderstorm", "thunder", "lightning", "rainstorm"),
            "phrase": "stormy sky, thunder and lightning, heavy rain",
            "markers": ("storm", "thunderstorm", "thunder", "lightning", "rainstorm", "storm clouds"),
            "adjectives": ("stormy",),
            "mild": ("gathering storm clouds", "gathering storm"),
            "strong": ("violent thunderstorm, lightning strikes, torrential rain", "violent storm"),
        },
        {
            "key": "snow",
            "aliases": ("snow", "snowy", "snowing", "snowier", "snowfall", "snowflakes", "blizzard"),
            "phrase": "falling snow, snow-covered ground",
            "markers": ("snow", "snowing", "snowfall", "snowflakes", "blizzard", "snow falling", "falling snow"),
            "adjectives": ("snowy", "snow-covered", "snow-capped"),
            "mild": ("light snowflakes drifting", "light snow"),
            "strong": ("heavy snowfall, blizzard", "heavy snow"),
        },
        {
            "key": "fog",
            "aliases": ("fog", "foggy", "foggier", "mist", "misty", "mistier", "haze", "hazy"),
            "phrase": "drifting fog",
            "markers": ("fog", "mist", "haze"),
            "adjectives": ("foggy", "misty", "hazy", "fog-covered"),
            "mild": ("light haze", "light haze"),
            "strong": ("thick dense fog", "thick fog"),
        },
        {
            "key": "sunny",
            "aliases": ("sunny", "sunnier", "sunshine", "sun", "clear sky", "clear skies", "clear weather",
                        "blue sky", "blue skies"),
            "phrase": "bright sunshine, clear blue sky",
            "markers": ("sunshine", "sunlight", "bright sun", "clear sky", "clear skies", "blue sky", "blue skies",
                        "cloudless sky"),
            "adjectives": ("sunny", "sunlit", "sun-drenched"),
            "mild": ("soft sunshine", "some sunshine"),
            "strong": ("blazing sunshine, cloudless sky", "blazing sunshine"),
            "label": "sunshine",
            "conflicts": ("night",),
        },
        {
            "key": "overcast",
            "aliases": ("cloudy", "cloudier", "overcast", "grey sky", "gray sky", "grey skies", "gray skies"),
            "phrase": "overcast sky, soft diffuse light",
            "markers": ("grey sky", "gray sky", "grey skies", "gray skies", "cloudy sky"),
            "adjectives": ("overcast", "cloudy"),
            "mild": ("a few clouds", "a few clouds"),
            "strong": ("heavy dark clouds", "heavy clouds"),
            "label": "overcast sky",
        },
    )},
    {"name": "season", "additive": False, "options": (
        {
            "key": "winter",
            "aliases": ("winter", "wintry", "wintery", "wintertime", "winter time"),
            "phrase": "in winter, frosty air, bare trees",
            "markers": ("wintertime", "winter time"),
            "adjectives": ("winter", "wintry", "wintery"),
        },
        {
            "key": "summer",
            "aliases": ("summer", "summertime", "summer time", "summery"),
            "phrase": "in summer, lush green trees",
            "markers": ("summertime", "summer time", "midsummer"),
            "adjectives": ("summer", "summery"),
        },
        {
            "key": "autumn",
            "aliases": ("autumn", "fall", "autumnal", "autumn time"),
            "phrase": "in autumn, orange and red falling leaves",
            "markers": ("in the fall", "fall foliage", "fall leaves", "fall colors", "autumn leaves"),
            "adjectives": ("autumn", "autumnal"),
        },
        {
            "key": "spring",
            "aliases": ("spring", "springtime", "spring time"),
            "phrase": "in spring, blossoming trees",
            "markers": ("spring time", "cherry blossoms"),
            "adjectives": ("spring", "springtime"),
        },
    )},
    {"name": "speed", "additive": False, "options": (
        {
            "key": "slow",
            "aliases": ("slow", "slower", "slow motion", "slo mo", "slow mo", "slowmo", "slomo", "slow down",
                        "slow it down", "slowed down", "half speed"),
            "phrase": "slow motion",
            "markers": ("slow motion", "slow mo", "slowmo", "slo mo", "slowed down", "slowly", "slowed motion"),
            "mild": ("gently slowed motion", "slightly slower motion"),
            "strong": ("extreme slow motion", "extreme slow motion"),
            "label": "slow motion",
        },
        {
            "key": "fast",
            "aliases": ("fast", "faster", "quick", "quicker", "speed up", "sped up", "speed it up", "fast paced",
                        "fast motion", "double speed"),
            "phrase": "fast-paced motion",
            "markers": ("fast-paced", "fast motion", "sped up", "quickly", "rapid", "rapidly", "frenetic"),
            "mild": ("slightly faster pace", "slightly faster motion"),
            "strong": ("very fast, frenetic motion", "very fast motion"),
            "label": "faster motion",
        },
        {
            "key": "timelapse",
            "aliases": ("timelapse", "time lapse", "hyperlapse"),
            "phrase": "time-lapse",
            "markers": ("time lapse", "timelapse", "hyperlapse"),
            "label": "time-lapse",
        },
    )},
    {"name": "color palette", "additive": False, "options": (
        {
            "key": "warm",
            "aliases": ("warm", "warmer", "warm colors", "warm colours", "warm tones", "warm palette",
                        "warm light", "warm lighting"),
            "phrase": "warm golden color palette",
            "markers": ("warm tones", "warm colors", "warm colours", "warm palette", "warm color palette",
                        "warm lighting", "warm light", "warm glow", "golden tones", "orange tones"),
            "mild": ("slightly warm tones", "slightly warmer tones"),
            "strong": ("rich saturated warm orange tones", "strongly warm tones"),
            "label": "warm tones",
        },
        {
            "key": "cool",
            "aliases": ("cool", "cooler", "cool tones", "cold tones", "cool colors", "cool colours", "blue tones",
                        "bluer"),
            "phrase": "cool blue color palette",
            "markers": ("cool tones", "cool colors", "cool colours", "cold tones", "blue tones", "cool palette",
                        "cool color palette", "teal tones", "cool blue tones"),
            "mild": ("slightly cool tones", "slightly cooler tones"),
            "strong": ("icy cold blue tones", "icy blue tones"),
            "label": "cool tones",
        },
        {
            "key": "pastel",
            "aliases": ("pastel", "pastels", "pastel colors", "pastel colours", "pastel tones"),
            "phrase": "soft pastel color palette",
            "markers": ("pastel", "pastels", "pastel colors", "pastel colours", "pastel tones"),
            "label": "pastel colors",
        },
        {
            "key": "neon",
            "aliases": ("neon", "neon colors", "neon colours", "neon lights", "neon lit"),
            "phrase": "vivid neon colors, glowing neon lights",
            "markers": ("neon", "neon lights", "neon colors", "neon colours", "neon glow", "neon lit"),
            "label": "neon colors",
        },
        {
            "key": "monochrome",
            "aliases": ("monochrome", "monochromatic", "black and white", "grayscale", "greyscale", "gray scale",
                        "grey scale"),
            "phrase": "black and white, monochrome",
            "markers": ("black and white", "monochrome", "monochromatic", "grayscale", "greyscale", "b&w"),
            "label": "black and white",
        },
        {
            "key": "vibrant",
            "aliases": ("vibrant", "vivid", "colorful", "colourful", "more colorful", "saturated",
                        "vibrant colors", "vibrant colours"),
            "phrase": "vibrant saturated colors",
            "markers": ("vibrant", "vivid colors", "colorful", "colourful", "saturated", "vibrant colors",
                        "vibrant colours"),
            "mild": ("slightly more vivid colors", "slightly more vivid colors"),
            "strong": ("hyper-saturated colors, bursting with color", "hyper-saturated colors"),
            "label": "vibrant colors",
        },
    )},
    {"name": "camera movement", "additive": False, "options": (
        {
            "key": "zoom_in",
            "aliases": ("zoom", "zoom in", "zooming in", "push in", "zoom closer"),
            "phrase": "slow camera zoom in",
            "markers": ("zoom", "zoom in", "zooms in", "zooming in", "push in", "pushes in", "slow zoom"),
            "label": "zoom in",
        },
        {
            "key": "zoom_out",
            "aliases": ("zoom out", "zooming out", "pull back", "pull out", "pulls back"),
            "phrase": "slow camera zoom out",
            "markers": ("zoom out", "zooms out", "zooming out", "pull back", "pulls back", "pulling back"),
            "label": "zoom out",
        },
        {
            "key": "pan",
            "aliases": ("pan", "panning", "pan shot", "camera pan", "pan across"),
            "phrase": "smooth panning camera",
            "markers": ("panning", "pans across", "pan across", "pan shot", "camera pan", "panning shot",
                        "panning camera"),
            "label": "camera pan",
        },
        {
            "key": "dolly",
            "aliases": ("dolly", "dolly shot", "dolly in", "tracking", "tracking shot"),
            "phrase": "smooth dolly tracking shot",
            "markers": ("dolly", "dolly shot", "dolly in", "dolly out", "tracking shot", "tracking camera"),
            "label": "dolly shot",
        },
        {
            "key": "aerial",
            "aliases": ("drone", "drone shot", "aerial", "aerial shot", "aerial view", "bird's eye view",
                        "birds eye view", "bird's eye", "overhead shot", "from above", "top down"),
            "phrase": "aerial drone shot",
            "markers": ("drone shot", "aerial", "aerial shot", "aerial view", "bird's eye view", "birds eye view",
                        "overhead shot", "top down view", "top down shot"),
            "label": "aerial drone shot",
        },
        {
            "key": "handheld",
            "aliases": ("handheld", "hand held", "shaky cam", "shaky camera", "shakycam"),
            "phrase": "handheld camera, natural camera shake",
            "markers": ("handheld", "hand held", "shaky cam", "shaky camera", "camera shake"),
            "label": "handheld camera",
        },
        {
            "key": "static",
            "aliases": ("static", "static shot", "static camera", "still camera", "locked off", "tripod",
                        "tripod shot", "steady camera", "stable camera", "no camera movement"),
            "phrase": "static locked-off camera",
            "markers": ("static shot", "static camera", "locked off", "locked off camera", "tripod shot",
                        "still camera"),
            "label": "static camera",
        },
    )},
    {"name": "framing", "additive": False, "options": (
        {
            "key": "close_up",
            "aliases": ("close up", "closeup", "close up shot", "closer", "extreme close up", "tight shot",
                        "tighter"),
            "phrase": "close-up shot",
            "markers": ("close up", "closeup", "close up shot", "extreme close up", "tight shot", "close shot"),
            "strong": ("extreme close-up shot", "extreme close-up"),
            "label": "close-up",
        },
        {
            "key": "medium",
            "aliases": ("medium", "medium shot", "mid shot"),
            "phrase": "medium shot",
            "markers": ("medium shot", "mid shot"),
            "label": "medium shot",
        },
        {
            "key": "wide",
            "aliases": ("wide", "wider", "wide shot", "wide angle", "wide angle shot", "long shot",
                        "establishing shot", "full shot"),
            "phrase": "wide establishing shot",
            "markers": ("wide shot", "wide angle", "wide angle shot", "long shot", "establishing shot",
                        "full shot"),
            "label": "wide shot",
        },
    )},
    {"name": "visual style", "additive": False, "options": (
        {
            "key": "anime",
            "aliases": ("anime", "anime style", "manga", "japanese animation", "cel shaded", "cel shading"),
            "phrase": "anime style, cel-shaded, hand-drawn animation",
            "markers": ("anime style", "manga", "cel shaded", "cel shading"),
            "adjectives": ("anime",),
        },
        {
            "key": "film_noir",
            "aliases": ("film noir", "noir"),
            "phrase": "film noir style, black and white, high-contrast shadows",
            "markers": ("film noir",),
            "adjectives": ("noir",),
            "label": "film noir",
            "conflicts": ("warm", "cool", "pastel", "neon", "vibrant"),
        },
        {
            "key": "watercolor",
            "aliases": ("watercolor", "watercolour", "watercolors", "watercolours", "watercolor painting",
                        "watercolour painting", "water color", "water colour"),
            "phrase": "watercolor painting style, soft bleeding colors",
            "markers": ("watercolour", "watercolor painting", "watercolour painting", "water color",
                        "water colour"),
            "adjectives": ("watercolor", "watercolour"),
        },
        {
            "key": "pixel_art",
            "aliases": ("pixel art", "pixel", "pixelated", "pixel style", "8 bit", "8bit", "16 bit", "16bit",
                        "retro game", "retro video game"),
            "phrase": "16-bit pixel art style",
            "markers": ("pixel art", "8 bit", "16 bit", "8bit", "16bit", "pixel art style"),
            "adjectives": ("pixelated", "pixel art", "8-bit", "16-bit"),
        },
        {
            "key": "cinematic",
            "aliases": ("cinematic", "movie", "movie like", "film like", "hollywood"),
            "phrase": "cinematic film look, anamorphic lens, shallow depth of field",
            "markers": ("anamorphic", "shallow depth of field"),
            "adjectives": ("cinematic",),
        },
        {
            "key": "claymation",
            "aliases": ("claymation", "clay animation", "clay", "stop motion", "plasticine"),
            "phrase": "claymation, stop-motion clay animation",
            "markers": ("clay animation", "stop motion"),
            "adjectives": ("claymation", "plasticine", "stop-motion"),
        },
        {
            "key": "vintage_film",
            "aliases": ("vintage", "vintage film", "old film", "retro film", "super 8", "8mm", "16mm",
                        "film grain", "old movie", "old school"),
            "phrase": "vintage film look, 16mm film grain, faded colors",
            "markers": ("vintage film", "old film", "retro film", "super 8", "film grain", "8mm", "16mm",
                        "faded colors"),
            "label": "vintage film",
        },
        {
            "key": "cyberpunk",
            "aliases": ("cyberpunk", "cyber punk"),
            "phrase": "cyberpunk style, futuristic neon-lit atmosphere, holographic signs",
            "markers": ("cyber punk",),
            "adjectives": ("cyberpunk",),
        },
        {
            "key": "photorealistic",
            "aliases": ("realistic", "photorealistic", "photo realistic", "photoreal", "live action", "real life",
                        "realism", "hyperrealistic", "hyper realistic"),
            "phrase": "photorealistic, lifelike detail",
            "markers": ("photo realistic", "hyper realistic", "photoreal", "live action", "realism"),
            "adjectives": ("photorealistic", "realistic", "hyperrealistic", "live-action"),
        },
        {
            "key": "oil_painting",
            "aliases": ("oil painting", "oil paint", "painterly"),
            "phrase": "oil painting style, visible brush strokes",
            "markers": ("oil painting", "brush strokes"),
            "adjectives": ("painterly",),
            "label": "oil painting",
        },
    )},
    {"name": "mood", "additive": False, "options": (
        {
            "key": "joyful",
            "aliases": ("happy", "happier", "joyful", "joyous", "cheerful", "upbeat", "uplifting", "playful",
                        "fun", "lighthearted", "light hearted"),
            "phrase": "joyful, upbeat mood",
            "markers": ("euphoric",),
            "adjectives": ("joyful", "happy", "joyous", "cheerful", "upbeat", "uplifting", "playful",
                           "lighthearted"),
            "mild": ("a gently cheerful mood", "gently cheerful"),
            "strong": ("euphoric, exuberant mood", "euphoric"),
        },
        {
            "key": "melancholic",
            "aliases": ("melancholic", "melancholy", "sad", "sadder", "somber", "sombre", "gloomy", "gloomier",
                        "depressing", "mournful", "wistful"),
            "phrase": "melancholic, somber mood",
            "markers": ("sorrowful",),
            "adjectives": ("melancholic", "melancholy", "sad", "somber", "sombre", "gloomy", "mournful", "wistful"),
            "mild": ("a slightly wistful mood", "slightly wistful"),
            "strong": ("deeply sorrowful, heartbreaking mood", "deeply sorrowful"),
        },
        {
            "key": "dreamy",
            "aliases": ("dreamy", "dreamier", "dreamlike", "dream like", "ethereal", "surreal", "otherworldly"),
            "phrase": "dreamy, ethereal atmosphere, soft glow",
            "markers": ("dream like",),
            "adjectives": ("dreamy", "dreamlike", "ethereal", "surreal", "otherworldly"),
        },
        {
            "key": "dramatic",
            "aliases": ("dramatic", "intense", "epic", "powerful"),
            "phrase": "dramatic, intense atmosphere",
            "adjectives": ("dramatic", "intense", "epic"),
            "strong": ("epic, overwhelming intensity", "epic"),
        },
        {
            "key": "calm",
            "aliases": ("calm", "calmer", "peaceful", "serene", "tranquil", "relaxed", "relaxing", "chill",
                        "mellow"),
            "phrase": "calm, peaceful atmosphere",
            "markers": ("relaxing",),
            "adjectives": ("calm", "peaceful", "serene", "tranquil", "relaxed", "mellow"),
        },
    )},
)

# Words that carry no change of their own ("make it ...", "... style please"). An instruction is
# handled by the templates only if every word is an option alias, an intensity, a negation or one
# of these, so anything else ("keep the same dancer", "red umbrella") goes to the LLM.
FILLER_WORDS = tuple("""
    make made making it its it's the a an please pls change changing turn turning switch set go
    to into add adding with and or nor plus also then in at on during of style styled look looks
    looking like feel feeling vibe vibes scene scenes shot video clip footage be should could can
    would you i i'd i'm we let let's lets want need some this that so just instead now kind sort
    tone tones color colors colour colours palette lighting weather time season camera movement
    mood atmosphere version do give me us try use apply effect thanks thank overall whole
    entire all everything is are was be too as well again maybe there there's here one
    """.split())
# Words that turn a change into a removal ("no rain", "without snow", "remove the fog").
NEGATION_WORDS = ("no", "not", "without", "remove", "removing", "delete", "get rid of", "take out",
                  "take away", "lose", "drop", "stop", "no more", "no longer", "don't", "dont", "do not",
                  "don't want", "instead of", "rather than", "turn off", "minus", "cut", "eliminate", "none")
# Words that make a change stronger ("much more rain") or milder ("a bit warmer").
STRONG_WORDS = ("much", "very", "lots", "lots of", "a lot", "a lot more", "way", "way more", "extra", "even",
                "even more", "really", "super", "heavy", "heavier", "heavily", "strong", "stronger",
                "extremely", "very much", "far", "significantly", "dramatically", "a lot of", "tons of",
                "intensely")
MILD_WORDS = ("a bit", "a little", "a little bit", "bit", "little", "slightly", "somewhat", "a touch", "touch",
              "a tad", "tad", "light", "lighter", "gentle", "gently", "subtle", "subtly", "less", "mildly",
              "soft", "softer", "kinda", "kind of", "sort of", "a touch of")
