// Lays the single-page book out for print; tools/pdf.py runs it in the page once MathJax has
// typeset every equation, and prints the page after it. The argument gives the book's title
// and its parts in the order of _toc.yml; the result reports what the printed page holds.
async ({title, subtitle, date, parts}) => {
  const article = document.querySelector('article.bd-article');
  const sectionOf = doc => {
    const anchor = document.getElementById(`document-${doc}`);
    let node = anchor ? anchor.nextElementSibling : null;
    while (node && node.tagName !== 'SECTION') node = node.nextElementSibling;
    return node;
  };
  const docs = parts.flatMap(part => part.chapters.map(chapter => chapter.doc));
  const root = docs[0];
  const sections = Object.fromEntries(docs.map(doc => [doc, sectionOf(doc)]));
  const missing = docs.filter(doc => !sections[doc] && doc !== root);
  sections[root] = article.querySelector('section');
  // The root page is titled as the book, which the title page already shows: in print it is
  // the introduction.
  sections[root].querySelector('h1').textContent = 'Introduction';

  // The chapters leave the root page they are nested in, one <div class="pdf-chapter"> each,
  // in the order of _toc.yml, after a title page and the contents.
  const book = document.createElement('main');
  book.id = 'pdf-book';
  const page = document.createElement('div');
  page.className = 'pdf-title-page';
  page.innerHTML = '<p class="pdf-title"></p><p class="pdf-subtitle"></p><p class="pdf-date"></p>';
  page.children[0].textContent = title;
  page.children[1].textContent = subtitle;
  page.children[2].textContent = date;
  book.append(page);
  const contents = document.createElement('nav');
  contents.className = 'pdf-contents';
  contents.innerHTML = '<h1 id="pdf-contents">Contents</h1>';
  book.append(contents);
  const chapters = [];
  for (const doc of docs) {
    const section = sections[doc];
    if (!section) continue;
    const chapter = document.createElement('div');
    chapter.className = 'pdf-chapter';
    chapter.dataset.doc = doc;
    chapter.append(section);
    chapters.push(chapter);
  }
  // What is left of the root page's nesting (the toctree's wrapper) is empty now.
  for (const wrapper of document.querySelectorAll('.toctree-wrapper')) wrapper.remove();
  book.append(...chapters);
  document.body.replaceChildren(book);
  document.documentElement.dataset.theme = 'light';
  document.documentElement.dataset.mode = 'light';

  // Headings by depth within their chapter: the chapter's title is an <h1>, its sections <h2>
  // and so on, whatever depth the root page nested them at. The PDF's outline follows them.
  const retag = (element, tag) => {
    const copy = document.createElement(tag);
    for (const attribute of element.attributes) copy.setAttribute(attribute.name, attribute.value);
    copy.append(...element.childNodes);
    element.replaceWith(copy);
    return copy;
  };
  for (const chapter of chapters) {
    for (const heading of [...chapter.querySelectorAll('h1, h2, h3, h4, h5, h6')]) {
      let depth = 0;
      for (let node = heading.parentElement; node !== chapter; node = node.parentElement) {
        if (node.tagName === 'SECTION') depth += 1;
      }
      if (depth > 0) retag(heading, `h${Math.min(depth, 6)}`);
    }
  }
  for (const link of document.querySelectorAll('a.headerlink, button, .copybtn')) link.remove();

  // Verification cells are collapsed on the web page (hide-input): in print, their input stays
  // out as it does there, and their output shows. Anything else folded is opened.
  for (const hidden of document.querySelectorAll('details.above-input')) hidden.remove();
  for (const details of document.querySelectorAll('details')) {
    details.open = true;
    details.querySelector(':scope > summary')?.remove();
  }

  // The single page repeats ids across chapters (a section's "setup", a citation's "id14"),
  // and its links give the root page's file (book/intro.html#id14): each link goes to the one
  // element it means (a citation to the bibliography's entry, else its own chapter's), and
  // every repeated id is made unique.
  const chapterOf = element => element.closest('.pdf-chapter');
  const byId = new Map();
  for (const element of book.querySelectorAll('[id]')) {
    byId.set(element.id, [...(byId.get(element.id) || []), element]);
  }
  const docOf = path => {
    const doc = path.replace(/^\/+/, '').replace(/\.html$/, '');
    return docs.includes(doc) ? doc : null;
  };
  // The introduction's link to the PDF edition points at the PDF itself: its text stays.
  for (const link of book.querySelectorAll('a[href$="cnn-blocks-book.pdf"]')) {
    link.replaceWith(...link.childNodes);
  }
  const targets = new Map();
  const broken = [];
  for (const link of book.querySelectorAll('a[href]')) {
    const url = new URL(link.getAttribute('href'), location.href);
    if (url.origin !== location.origin) continue;
    const id = decodeURIComponent(url.hash.slice(1));
    let candidates = id ? byId.get(id) || [] : [];
    if (!id && docOf(url.pathname) && sections[docOf(url.pathname)]) {
      candidates = [sections[docOf(url.pathname)]];
    }
    if (candidates.length > 1 && link.closest('.bibtex-citation')) {
      candidates = candidates.filter(element => element.matches('.citation'));
    }
    if (candidates.length > 1) {
      candidates = candidates.filter(element => chapterOf(element) === chapterOf(link));
    }
    if (candidates.length === 1) {
      targets.set(link, candidates[0]);
    } else {
      broken.push(`${link.textContent.trim().slice(0, 40)} -> ${link.getAttribute('href')}`);
    }
  }
  let unique = 0;
  for (const [id, elements] of byId) {
    if (elements.length > 1) {
      for (const element of elements) element.id = `${id}--${(unique += 1)}`;
    }
  }
  for (const [link, target] of targets) link.setAttribute('href', `#${target.id}`);

  // Solutions: opened, and gathered after the chapter's last section, so that an exercise is
  // read before its answer; each exercise links to its solution and back.
  let solutionCount = 0;
  for (const chapter of chapters) {
    const solutions = [...chapter.querySelectorAll('div.solution')];
    if (!solutions.length) continue;
    const section = document.createElement('section');
    section.className = 'pdf-solutions';
    section.id = `pdf-solutions-${chapter.dataset.doc.replace(/\W/g, '-')}`;
    const heading = document.createElement('h2');
    heading.textContent = 'Solutions';
    section.append(heading);
    for (const solution of solutions) {
      solution.classList.remove('toggle-hidden', 'dropdown', 'toggle');
      const exercise = solution.querySelector('.admonition-title a[href^="#"]');
      const target = exercise && document.getElementById(exercise.getAttribute('href').slice(1));
      const title = target && target.querySelector('.admonition-title');
      if (title && solution.id) {
        const link = document.createElement('a');
        link.className = 'pdf-solution-link';
        link.href = `#${solution.id}`;
        link.textContent = 'solution';
        title.append(link);
      }
      section.append(solution);
      solutionCount += 1;
    }
    chapter.querySelector(':scope > section').append(section);
  }

  // Every heading's place in the PDF: Chromium writes a named destination (page and height)
  // for each element that a link of the page points at, even a link that is not displayed.
  // tools/pdf.py builds the outline (bookmarks) from them, and writes the contents' page
  // numbers into the space each entry keeps for it: one print, no second layout.
  const targetOf = heading => (heading.id ? heading : heading.closest('section'));
  const headings = [...book.querySelectorAll('h1, h2, h3, h4, h5, h6')];
  const destinations = document.createElement('nav');
  destinations.hidden = true;
  for (const heading of headings) {
    const link = document.createElement('a');
    link.href = `#${targetOf(heading).id}`;
    destinations.append(link);
  }
  book.append(destinations);

  // The contents: every chapter (h1) and section (h2), under the captions of _toc.yml's parts;
  // the page number is a link of its own, a box of fixed width at the end of the line.
  for (const part of parts) {
    const caption = document.createElement('p');
    caption.className = 'pdf-part';
    caption.textContent = part.caption || '';
    const list = document.createElement('ul');
    for (const {doc} of part.chapters) {
      const chapter = chapters.find(c => c.dataset.doc === doc);
      if (!chapter) continue;
      for (const heading of chapter.querySelectorAll('h1, h2')) {
        const target = `#${targetOf(heading).id}`;
        const item = document.createElement('li');
        item.className = `pdf-toc-${heading.tagName.toLowerCase()}`;
        const link = document.createElement('a');
        link.href = target;
        link.textContent = heading.textContent.trim();
        const number = document.createElement('a');
        number.className = 'pdf-page-number';
        number.href = target;
        number.textContent = '\u00a0';
        item.append(link, number);
        list.append(item);
      }
    }
    if (part.caption) contents.append(caption);
    contents.append(list);
  }

  // Images load before printing (a lazy image would print empty).
  await Promise.all([...document.images].map(image => {
    image.loading = 'eager';
    return image.decode().catch(() => null);
  }));

  // What the tests check: per chapter its title and its figures (an SVG in an <img> prints as
  // vector drawing); anything wider than the printable width is cut at the margin.
  const width = document.documentElement.clientWidth;
  const cut = [];
  for (const element of book.querySelectorAll(
    'pre, table, img, figure, div.math, mjx-container[display="true"]')) {
    const box = element.getBoundingClientRect();
    if (element.scrollWidth > element.clientWidth + 1 || box.right > width + 1) {
      cut.push(`${element.tagName}: ${element.textContent.trim().slice(0, 60)}`);
    }
  }
  // Input code keeps its lines whole: a code line of at most 84 characters fits the page.
  const wrapped = [];
  for (const pre of document.querySelectorAll('#pdf-book .cell_input pre')) {
    const lines = pre.textContent.replace(/\n$/, '').split('\n').length;
    const height = parseFloat(getComputedStyle(pre).lineHeight);
    const inner = pre.clientHeight - parseFloat(getComputedStyle(pre).paddingTop)
      - parseFloat(getComputedStyle(pre).paddingBottom);
    if (inner > (lines + 0.5) * height) wrapped.push(pre.textContent.slice(0, 60));
  }
  const raw = [];
  const walker = document.createTreeWalker(book, NodeFilter.SHOW_TEXT);
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (node.parentElement.closest('pre, code, script, style, mjx-container')) continue;
    if (/\$\$|\\\(|\\\[|\\begin\{/.test(node.textContent)) raw.push(node.textContent.slice(0, 60));
  }
  return {
    // Each heading's title, depth and destination, in document order (the outline).
    headings: headings.map(heading => ({
      title: heading.textContent.replace(/\s+/g, ' ').trim(),
      depth: Number(heading.tagName[1]) - 1,
      destination: targetOf(heading).id,
    })),
    // The contents' entries, in order: the destination and depth of each.
    contents: [...contents.querySelectorAll('li')].map(item => ({
      destination: item.querySelector('a').getAttribute('href').slice(1),
      depth: item.classList.contains('pdf-toc-h1') ? 0 : 1,
    })),
    chapters: chapters.map(chapter => ({
      doc: chapter.dataset.doc,
      title: chapter.querySelector('h1').textContent.trim(),
      // A figure's image, loaded and laid out at a readable size, with its number.
      figures: [...chapter.querySelectorAll('figure')].map(figure => {
        const image = figure.querySelector('img');
        return {
          number: figure.querySelector('.caption-number')?.textContent.trim() || '',
          drawn: Boolean(image && image.complete && image.naturalWidth > 0
                         && image.getBoundingClientRect().height > 40),
        };
      }),
      svg_images: [...chapter.querySelectorAll('img')].filter(
        image => /\.svg$/.test(image.src)).length,
      images: chapter.querySelectorAll('img').length,
      solutions: chapter.querySelectorAll('.pdf-solutions div.solution').length,
    })),
    missing,
    broken_links: broken,
    cut,
    wrapped_code: wrapped,
    raw_tex: raw,
    math_errors: document.querySelectorAll('mjx-merror').length,
    equations: document.querySelectorAll('#pdf-book mjx-container').length,
    solutions: solutionCount,
    exercises: document.querySelectorAll('#pdf-book div.exercise').length,
  };
}
