// Render the math that pymdownx.arithmatex (generic mode) leaves in the pages, with the KaTeX copy in
// docs/assets/katex (no network needed); on every page Material for MkDocs loads, instant navigation included.
document$.subscribe(({ body }) => {
  renderMathInElement(body, {
    delimiters: [
      { left: "$$", right: "$$", display: true },
      { left: "$", right: "$", display: false },
      { left: "\\(", right: "\\)", display: false },
      { left: "\\[", right: "\\]", display: true },
    ],
  });
});
